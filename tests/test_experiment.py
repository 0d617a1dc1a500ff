"""The Fashion-MNIST ablation experiment: arm definitions, statistics, the results table, stage caching (a run is
finished only when its metrics.json says "complete": true) with the project's CLIs stubbed, and, once the CLIs take
every flag the experiment passes, the whole experiment end to end at its smoke budget."""
import json
import os

import pytest
import torch
from PIL import Image

import tools.experiment_fashion_mnist as E

pytestmark = pytest.mark.usefixtures("one_thread")


def flag(argv, name, default=None):
    return argv[argv.index(name) + 1] if name in argv else default


# --------------------------------------------------------------------------------------------------
# Arms and budgets


def test_arms_aliases_and_selection():
    assert E.resolve_arms(["grn-off"]) == ["v1-fcmae"]
    assert E.resolve_arms(["mask-0.6", "scratch", "v2-fcmae"]) == ["v2-fcmae", "scratch"]
    assert E.resolve_arms(["all"]) == list(E.ARMS) == ["v2-fcmae", "v1-fcmae", "naive", "mask-0.4", "mask-0.75",
                                                        "scratch"]
    with pytest.raises(ValueError, match="unknown arm 'grn'"):
        E.resolve_arms(["grn"])
    with pytest.raises(SystemExit):  # argparse's usage error
        E.main(["--arm", "nope", "--work-dir", "/nonexistent/never"])


def test_long_budget_changes_only_pretraining_and_shares_scratch_runs(tmp_path):
    default, long = (E.Stages(str(tmp_path), E.BUDGETS[b], workers=2) for b in ("default", "long"))
    v2, scratch = E.ARMS["v2-fcmae"], E.ARMS["scratch"]
    assert flag(long.pretrain_argv(v2, 0), "--epochs") == "4" and flag(default.pretrain_argv(v2, 0), "--epochs") == "1"
    assert long.finetune_argv(1, "c.pth") == default.finetune_argv(1, "c.pth")  # the same evaluation
    # pretrained fine-tunes never mix; scratch fine-tunes are the same runs (reused, not rerun)
    assert default.finetune_name(v2, 0, 1) == "finetune_v2-fcmae_p0_s1_0.01_96px_15ep"  # unchanged: cached runs
    assert long.finetune_name(v2, 0, 1) == "finetune_v2-fcmae_p0x4ep_s1_0.01_96px_15ep"
    assert long.finetune_name(scratch, None, 1) == default.finetune_name(scratch, None, 1)
    # V1-FCMAE fine-tunes V1 blocks (GRN held at identity), under its own run names
    assert default.finetune_name(E.ARMS["v1-fcmae"], 0, 1) == "finetune_v1-fcmae_p0_nogrn_s1_0.01_96px_15ep"
    v1 = default.finetune_argv(1, "c.pth", encoder_grn=False)
    assert v1 == default.finetune_argv(1, "c.pth") + ["--no-encoder-grn"]
    assert long.pretrain_name(v2, 0) != default.pretrain_name(v2, 0)


def test_each_arm_changes_one_thing_and_gets_the_same_budget(tmp_path):
    stages = E.Stages(str(tmp_path), E.BUDGETS["default"], workers=2)
    argvs = {name: stages.pretrain_argv(arm, 0) for name, arm in E.ARMS.items() if arm.pretrained}
    assert "--no-encoder-grn" in argvs["v1-fcmae"] and "--no-encoder-grn" not in argvs["v2-fcmae"]
    assert flag(argvs["naive"], "--backend") == "naive" and flag(argvs["v2-fcmae"], "--backend") == "sparse"
    assert {n: flag(a, "--mask-ratio") for n, a in argvs.items()} == {
        "v2-fcmae": "0.6", "v1-fcmae": "0.6", "naive": "0.6", "mask-0.4": "0.4", "mask-0.75": "0.75"}

    def common(argv):  # everything but the arm's own flags
        out, skip = [], 0
        for i, a in enumerate(argv):
            if skip:
                skip -= 1
            elif a in ("--backend", "--mask-ratio"):
                skip = 1
            elif a != "--no-encoder-grn":
                out.append(a)
        return out

    assert len({tuple(common(a)) for a in argvs.values()}) == 1
    assert flag(argvs["v2-fcmae"], "--in-chans") == "1" and flag(argvs["v2-fcmae"], "--input-size") == "96"
    # fine-tuning: the same recipe from a checkpoint or from scratch; the seed is passed on
    fcmae, scratch = stages.finetune_argv(2, "ckpt.pth"), stages.finetune_argv(2, None)
    assert flag(fcmae, "--seed") == "2" and flag(fcmae, "--label-fraction") == "0.01"
    assert flag(fcmae, "--in-chans") == "1" and flag(fcmae, "--finetune") == "ckpt.pth" and "--finetune" not in scratch
    assert flag(fcmae, "--layer-decay") == "0.75" and flag(scratch, "--layer-decay") == "1"

    def recipe(argv):  # without the starting point
        drop = {i for i, a in enumerate(argv) if a in ("--finetune", "--layer-decay")}
        return [a for i, a in enumerate(argv) if i not in drop and i - 1 not in drop]

    assert recipe(fcmae) == recipe(scratch)
    for b in E.BUDGETS.values():
        assert len(b.finetune_seeds) >= 2 and len(b.pretrain_seeds) >= 1
    assert len(E.BUDGETS["default"].finetune_seeds) >= 3 and len(E.BUDGETS["full"].pretrain_seeds) == 2


def test_masked_fraction_distinguishes_the_ratios_at_96_px():
    fractions = [E.masked_fraction(r, 96) for r in (0.4, 0.6, 0.75)]
    assert fractions == pytest.approx([4 / 9, 6 / 9, 7 / 9])


# --------------------------------------------------------------------------------------------------
# Statistics and the table


def test_summarise_format_and_paired_gain():
    s = E.summarise([70.0, 72.0, 74.0])
    assert s == {"n": 3, "mean": 72.0, "std": pytest.approx(2.0), "values": [70.0, 72.0, 74.0]}
    assert E.fmt(s) == "72.00 ± 2.00 (n=3)" and E.fmt(E.summarise([1.5])) == "1.50 (n=1)" and E.fmt(None) == "—"
    # paired by fine-tuning seed: gains 5, 3, 7 (not the difference of the means of unpaired runs)
    gain = E.paired_gain({"p0/s0": 75.0, "p0/s1": 74.0, "p0/s2": 80.0}, {"s0": 70.0, "s1": 71.0, "s2": 73.0})
    assert gain["values"] == [5.0, 3.0, 7.0] and gain["mean"] == pytest.approx(5.0)
    assert gain["mean_minus_std"] == pytest.approx(5.0 - 2.0)
    # two pretraining seeds: each pairs with scratch's run of the same fine-tuning seed
    gain = E.paired_gain({"p0/s0": 75.0, "p1/s0": 77.0}, {"s0": 70.0})
    assert gain["values"] == [5.0, 7.0]
    assert E.paired_gain({"p0/s5": 1.0}, {"s0": 1.0}) is None


def test_results_table_rows():
    arm = lambda label, ft, knn=70.0: {  # noqa: E731
        "label": label, "describe": "d", "masked_fraction": 6 / 9 if label != "scratch" else None,
        "knn": E.summarise([knn]), "probe": E.summarise([60.0, 61.0]), "finetune": E.summarise(list(ft.values())),
        "finetune_runs": ft, "minutes": {"total": 12.0}}
    arms = {"v2-fcmae": arm("V2-FCMAE", {"p0/s0": 75.0, "p0/s1": 77.0}),
            "scratch": arm("scratch", {"s0": 70.0, "s1": 71.0})}
    lines = E.results_table(arms)
    assert lines[2].startswith("| V2-FCMAE | d | 67% | 70.00 (n=1) | 60.50 ± 0.71 (n=2) | 76.00 ± 1.41 (n=2) | "
                               "5.50 ± 0.71 (n=2) | +4.79 | 12.0 |")
    assert lines[3].startswith("| scratch | d | — |") and "| — | — |" in lines[3]


# --------------------------------------------------------------------------------------------------
# Stages: finished only when complete, cached across invocations (the CLIs stubbed)


def test_finished_needs_complete_true(tmp_path):
    assert E.finished(str(tmp_path)) is None
    for content, expected in [({"steps": 5}, None), ({"complete": False}, None), ("not json", None),
                              ({"complete": True, "acc1": 1.0}, {"complete": True, "acc1": 1.0})]:
        (tmp_path / "metrics.json").write_text(content if isinstance(content, str) else json.dumps(content))
        assert E.finished(str(tmp_path)) == expected


class FakeCLIs:
    """Stand-ins for the pretraining and fine-tuning CLIs: real checkpoints (random weights) and metrics.json,
    no training; accuracies made up from the arguments."""

    def __init__(self):
        self.pretrain_calls, self.finetune_calls = [], []

    def pretrain(self, argv):
        from models import create_fcmae

        self.pretrain_calls.append(argv)
        out = flag(argv, "--output-dir")
        os.makedirs(out, exist_ok=True)
        torch.manual_seed(int(flag(argv, "--seed")))
        model = create_fcmae("convnextv2_atto", in_chans=int(flag(argv, "--in-chans")))
        torch.save({"format": "fcmae-pretrain", "model_name": "convnextv2_atto", "model": model.state_dict(),
                    "step": 2, "history": {"curve": [[1, 1.2, 1], [2, 1.0, 1]]}},
                   os.path.join(out, "checkpoint-00000002.pth"))
        metrics = {"complete": True, "steps": 2, "last_loss": 1.0, "knn": [{"step": 2, "acc1": 50.0}]}
        with open(os.path.join(out, "metrics.json"), "w") as f:
            json.dump(metrics, f)
        return metrics

    def finetune(self, argv):
        self.finetune_calls.append(argv)
        out = flag(argv, "--output-dir")
        os.makedirs(out, exist_ok=True)
        acc = 70.0 + int(flag(argv, "--seed")) + (5.0 if "--finetune" in argv else 0.0)
        with open(os.path.join(out, "metrics.json"), "w") as f:
            json.dump({"complete": True, "acc1": acc, "steps": 2}, f)
        return {"acc1": acc}


@pytest.fixture
def fake_clis(monkeypatch):
    import fcmae.pretrain.cli
    import finetune.cli

    fakes = FakeCLIs()
    monkeypatch.setattr(fcmae.pretrain.cli, "main", fakes.pretrain)
    monkeypatch.setattr(finetune.cli, "run", fakes.finetune)
    return fakes


def test_stages_cached_across_invocations_and_arms_run_alone(tmp_path, fake_clis):
    work = tmp_path / "work"
    argv = ["--budget", "smoke", "--work-dir", str(work), "--num-workers", "0"]
    result = E.main(argv + ["--arm", "v2-fcmae", "grn-off", "scratch"])
    assert len(fake_clis.pretrain_calls) == 2 and len(fake_clis.finetune_calls) == 3 * 2
    assert set(result["arms"]) == {"v2-fcmae", "v1-fcmae", "scratch"}
    v2 = result["arms"]["v2-fcmae"]
    assert v2["finetune_runs"] == {"p0/s0": 75.0, "p0/s1": 76.0} and v2["finetune"]["n"] == 2
    assert result["gains"]["v2-fcmae"]["values"] == [5.0, 5.0]
    assert v2["probe"]["n"] == 2 and 0 <= v2["knn"]["mean"] <= 100 and v2["knn_curve"] == {"0": [{"step": 2,
                                                                                                  "acc1": 50.0}]}
    assert [len(s) for s in result["feature_diversity"]["distances"]["V2-FCMAE"]] == [2, 2, 6, 2]
    assert set(result["feature_diversity"]["distances"]) == {"V1-FCMAE", "V2-FCMAE", "random init"}
    md = (work / "results" / "results.md").read_text()
    assert "| V1-FCMAE |" in md and "| scratch |" in md and "gain − 1 std" in md and "Every value:" in md
    for png in ("arms.png", "curves.png", "feature_diversity.png"):
        assert Image.open(work / "results" / png).size[0] > 300
    timings = json.loads((work / "timings.json").read_text())
    assert sum(k.startswith("finetune_") for k in timings) == 6 and sum(k.startswith("pretrain_") for k in timings) == 2

    # again: everything is reused (no CLI call, no evaluation), the same numbers
    evaluations = (work / "evaluations.json").read_text()
    again = E.main(argv + ["--arm", "v2-fcmae", "v1-fcmae", "scratch"])
    assert len(fake_clis.pretrain_calls) == 2 and len(fake_clis.finetune_calls) == 6
    assert again["arms"] == result["arms"] and (work / "evaluations.json").read_text() == evaluations

    # one more arm alone: only its stages run; the table has all four
    E.main(argv + ["--arm", "naive"])
    assert len(fake_clis.pretrain_calls) == 3 and flag(fake_clis.pretrain_calls[-1], "--backend") == "naive"
    assert len(fake_clis.finetune_calls) == 8
    assert "| naive masking |" in (work / "results" / "results.md").read_text()


def test_a_stage_stopped_early_is_run_again(tmp_path, fake_clis):
    work = tmp_path / "work"
    argv = ["--budget", "smoke", "--work-dir", str(work), "--num-workers", "0", "--arm", "scratch"]
    E.main(argv)
    assert len(fake_clis.finetune_calls) == 2
    stages = E.Stages(str(work), E.BUDGETS["smoke"], 0)
    stopped = work / stages.finetune_name(E.ARMS["scratch"], None, 1) / "metrics.json"
    stopped.write_text(json.dumps({"complete": False, "acc1": 1.0}))  # what a run stopped by a signal leaves
    assert E.main(argv)["arms"]["scratch"]["finetune_runs"]["s1"] == 71.0
    assert len(fake_clis.finetune_calls) == 3 and flag(fake_clis.finetune_calls[-1], "--seed") == "1"
    stopped.write_text(json.dumps({"acc1": 1.0}))  # no "complete" key: not finished either
    E.main(argv)
    assert len(fake_clis.finetune_calls) == 4


def test_a_stage_that_returns_incomplete_is_an_error(tmp_path, monkeypatch):
    import finetune.cli

    def incomplete(argv):
        out = flag(argv, "--output-dir")
        os.makedirs(out, exist_ok=True)
        (open(os.path.join(out, "metrics.json"), "w")).write(json.dumps({"complete": False}))

    monkeypatch.setattr(finetune.cli, "run", incomplete)
    with pytest.raises(RuntimeError, match="without a complete metrics.json"):
        E.main(["--budget", "smoke", "--work-dir", str(tmp_path), "--num-workers", "0", "--arm", "scratch"])
    assert not any(k.startswith("finetune_") for k in json.loads((tmp_path / "timings.json").read_text()))


# --------------------------------------------------------------------------------------------------
# End to end through the real CLIs


def cli_flags_ready() -> bool:
    """Whether the CLIs take every flag the experiment passes (the lead adds --in-chans to fine-tuning)."""
    from fcmae.pretrain.options import build_parser as pretrain_parser
    from finetune.options import build_parser as finetune_parser

    def options(parser):
        return {s for a in parser._actions for s in a.option_strings}

    return {"--in-chans", "--no-encoder-grn", "--knn-every-epochs", "--seed"} <= options(pretrain_parser()) and \
        {"--in-chans", "--seed", "--label-fraction"} <= options(finetune_parser())


@pytest.mark.skipif(not cli_flags_ready(), reason="the fine-tune CLI has no --in-chans yet")
def test_smoke_budget_end_to_end(tmp_path):
    argv = ["--budget", "smoke", "--work-dir", str(tmp_path), "--num-workers", "0",
            "--arm", "v2-fcmae", "v1-fcmae", "naive", "scratch"]
    result = E.main(argv)
    assert set(result["arms"]) == {"v2-fcmae", "v1-fcmae", "naive", "scratch"}
    for r in result["arms"].values():
        assert r["finetune"]["n"] == 2 and r["probe"]["n"] == 2 and 0 <= r["knn"]["mean"] <= 100
    assert set(result["feature_diversity"]["distances"]) == {"V1-FCMAE", "V2-FCMAE", "random init"}
    out = tmp_path / "results"
    for png in ("arms.png", "curves.png", "feature_diversity.png"):
        assert Image.open(out / png).size[0] > 300
    # the V1 arm's encoder really has no GRN: its checkpoint's GRN parameters are all zero
    from fcmae.runtime.weights import timm_encoder

    v1 = timm_encoder(str(tmp_path / result["arms"]["v1-fcmae"]["checkpoints"]["0"]))[1]
    assert all((p == 0).all() for n, p in v1.named_parameters() if ".grn." in n)
    again = E.main(argv)  # every stage reused
    assert again["arms"] == result["arms"]
