"""The Fashion-MNIST ablation experiment: arm definitions, statistics, the results table, stage caching (a run is
finished only when its metrics.json says "complete": true) with the project's CLIs stubbed, and, once the CLIs take
every flag the experiment passes, the whole experiment end to end at its smoke budget."""
import json
import os

import pytest
import torch
from PIL import Image

import tools.experiment_ablations as E
from tests.conftest import TINY as TINY_MODEL
from tools.experiment_fashion_mnist import main as experiment_main

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
        experiment_main(["--arm", "nope", "--work-dir", "/nonexistent/never"])


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
        model = create_fcmae(E.MODEL, in_chans=int(flag(argv, "--in-chans")))
        torch.save({"format": "fcmae-pretrain", "model_name": E.MODEL, "model": model.state_dict(),
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
    monkeypatch.setattr(E, "MODEL", TINY_MODEL)  # the tiny test variant: the evaluations at a fraction of the cost
    monkeypatch.setattr(fcmae.pretrain.cli, "main", fakes.pretrain)
    monkeypatch.setattr(finetune.cli, "run", fakes.finetune)
    return fakes


def test_stages_cached_across_invocations_and_arms_run_alone(tmp_path, fake_clis):
    work = tmp_path / "work"
    argv = ["--budget", "smoke", "--work-dir", str(work), "--num-workers", "0"]
    result = experiment_main(argv + ["--arm", "v2-fcmae", "grn-off", "scratch"])
    assert len(fake_clis.pretrain_calls) == 2 and len(fake_clis.finetune_calls) == 3 * 2
    assert set(result["arms"]) == {"v2-fcmae", "v1-fcmae", "scratch"}
    v2 = result["arms"]["v2-fcmae"]
    assert v2["finetune_runs"] == {"p0/s0": 75.0, "p0/s1": 76.0} and v2["finetune"]["n"] == 2
    assert result["gains"]["v2-fcmae"]["values"] == [5.0, 5.0]
    assert v2["probe"]["n"] == 2 and 0 <= v2["knn"]["mean"] <= 100 and v2["knn_curve"] == {"0": [{"step": 2,
                                                                                                  "acc1": 50.0}]}
    assert [len(s) for s in result["feature_diversity"]["distances"]["V2-FCMAE"]] == [1, 1, 2, 1]
    assert set(result["feature_diversity"]["distances"]) == {"V1-FCMAE", "V2-FCMAE", "random init"}
    md = (work / "results" / "results.md").read_text()
    assert "| V1-FCMAE |" in md and "| scratch |" in md and "gain − 1 std" in md and "Every value:" in md
    for png in ("arms.png", "curves.png", "feature_diversity.png"):
        assert Image.open(work / "results" / png).size[0] > 300
    timings = json.loads((work / "timings.json").read_text())
    assert sum(k.startswith("finetune_") for k in timings) == 6 and sum(k.startswith("pretrain_") for k in timings) == 2

    # again: everything is reused (no CLI call, no evaluation), the same numbers
    evaluations = (work / "evaluations.json").read_text()
    again = experiment_main(argv + ["--arm", "v2-fcmae", "v1-fcmae", "scratch"])
    assert len(fake_clis.pretrain_calls) == 2 and len(fake_clis.finetune_calls) == 6
    assert again["arms"] == result["arms"] and (work / "evaluations.json").read_text() == evaluations

    # one more arm alone: only its stages run; the table has all four
    experiment_main(argv + ["--arm", "naive"])
    assert len(fake_clis.pretrain_calls) == 3 and flag(fake_clis.pretrain_calls[-1], "--backend") == "naive"
    assert len(fake_clis.finetune_calls) == 8
    assert "| naive masking |" in (work / "results" / "results.md").read_text()


def test_a_stage_stopped_early_is_run_again(tmp_path, fake_clis):
    work = tmp_path / "work"
    argv = ["--budget", "smoke", "--work-dir", str(work), "--num-workers", "0", "--arm", "scratch"]
    experiment_main(argv)
    assert len(fake_clis.finetune_calls) == 2
    stages = E.Stages(str(work), E.BUDGETS["smoke"], 0)
    stopped = work / stages.finetune_name(E.ARMS["scratch"], None, 1) / "metrics.json"
    stopped.write_text(json.dumps({"complete": False, "acc1": 1.0}))  # what a run stopped by a signal leaves
    assert experiment_main(argv)["arms"]["scratch"]["finetune_runs"]["s1"] == 71.0
    assert len(fake_clis.finetune_calls) == 3 and flag(fake_clis.finetune_calls[-1], "--seed") == "1"
    stopped.write_text(json.dumps({"acc1": 1.0}))  # no "complete" key: not finished either
    experiment_main(argv)
    assert len(fake_clis.finetune_calls) == 4


def test_a_stage_that_returns_incomplete_is_an_error(tmp_path, monkeypatch):
    import finetune.cli

    def incomplete(argv):
        out = flag(argv, "--output-dir")
        os.makedirs(out, exist_ok=True)
        (open(os.path.join(out, "metrics.json"), "w")).write(json.dumps({"complete": False}))

    monkeypatch.setattr(finetune.cli, "run", incomplete)
    with pytest.raises(RuntimeError, match="without a complete metrics.json"):
        experiment_main(["--budget", "smoke", "--work-dir", str(tmp_path), "--num-workers", "0", "--arm", "scratch"])
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
def test_smoke_budget_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setattr(E, "MODEL", TINY_MODEL)  # the tiny test variant: every stage at a fraction of the cost
    argv = ["--budget", "smoke", "--work-dir", str(tmp_path), "--num-workers", "0",
            "--arm", "v2-fcmae", "v1-fcmae", "naive", "scratch"]
    result = experiment_main(argv)
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
    again = experiment_main(argv)  # every stage reused
    assert again["arms"] == result["arms"]


# --------------------------------------------------------------------------------------------------
# The evidence study (tools/experiment_evidence.py) and its report (tools/experiment_report.py)

import math  # noqa: E402

import numpy as np  # noqa: E402

import tools.experiment_evidence as V  # noqa: E402
import tools.experiment_report as R  # noqa: E402

ROOT = os.path.join(os.path.dirname(__file__), "..")


def t_cdf(q: float, df: int, steps: int = 20000) -> float:
    """Student's t CDF at q > 0 by Simpson's rule on the density."""
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)
    f = [c * (1 + (q * i / steps) ** 2 / df) ** (-(df + 1) / 2) for i in range(steps + 1)]
    return 0.5 + q / steps / 3 * (f[0] + f[-1] + 4 * sum(f[1:-1:2]) + 2 * sum(f[2:-1:2]))


def test_hard_coded_t_quantiles():
    for df in range(1, 21):
        assert t_cdf(R.T_95[df], df) == pytest.approx(0.95, abs=2e-6), df
        assert t_cdf(R.T_975[df], df) == pytest.approx(0.975, abs=2e-6), df


def test_nested_gain_and_intervals():
    scratch = {0: 70.0, 1: 72.0}
    # gains: p0 (+4, +6) -> 5; p1 (+2, +2) -> 2; p2 (+5, +3) -> 4
    runs = {(0, 0): 74.0, (0, 1): 78.0, (1, 0): 72.0, (1, 1): 74.0, (2, 0): 75.0, (2, 1): 75.0}
    g = R.nested_gain(runs, scratch)
    assert g["per_pretrain_seed"] == {0: 5.0, 1: 2.0, 2: 4.0} and g["finetune_seeds"] == [0, 1]
    o = g["over_pretraining"]
    sd = math.sqrt(((5 - 11 / 3) ** 2 + (2 - 11 / 3) ** 2 + (4 - 11 / 3) ** 2) / 2)
    assert o["mean"] == pytest.approx(11 / 3) and o["sd"] == pytest.approx(sd)
    assert o["lower95"] == pytest.approx(11 / 3 - 2.919986 * sd / math.sqrt(3))
    assert o["ci95"][1] == pytest.approx(11 / 3 + 4.302653 * sd / math.sqrt(3))
    # over label subsets: the mean over pretraining seeds per fine-tuning seed: (4+2+5)/3, (6+2+3)/3
    assert g["over_labels"]["values"] == pytest.approx([11 / 3, 11 / 3]) and g["over_labels"]["sd"] == 0
    # a fine-tuning seed without a scratch run is not paired; one pretraining seed gives no interval
    one = R.nested_gain({(0, 0): 74.0, (0, 5): 99.0}, scratch)
    assert one["per_pretrain_seed"] == {0: 4.0} and one["over_pretraining"]["lower95"] is None
    d = R.two_sample([1.0, 2.0, 3.0], [0.0, 1.0, 2.0])
    assert d["diff"] == 1.0 and d["df"] == 4 and d["ci95"][0] == pytest.approx(1 - 2.776445 * math.sqrt(2 / 3))


def test_label_subsets_and_split_are_the_fine_tune_clis():
    """The pixel baselines, the bank and the fine-tune CLI draw from the same split, the same 600 per seed."""
    from fcmae.data.labelled import build_datasets

    study = V.STUDIES["full"]
    data = V.Data(study)
    cli = build_datasets(data_path=None, input_size=(32, 32), in_chans=1, label_fraction=study.finetune_fraction,
                         val_split=study.val_split, seed=3)
    assert np.array_equal(data.labels(3), cli.train.indices) and np.array_equal(data.val_idx, cli.val.indices)
    assert len(data.labels(3)) == 600 and len(data.val_idx) == 6000 and len(data.test_idx) == 10000
    assert not set(data.bank()) & set(data.val_idx) and len(data.bank()) == 6000


def test_pixel_models():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(200, 16, generator=g)
    y = (x[:, 0] > x[:, 1]).long()
    assert V.top1(V.logistic_regression(x, y, 1e-4, classes=2)(x), y) > 95
    assert V.top1(V.pixel_knn(x, y, 1)(x), y) == 100.0  # each point is its own nearest neighbour


def test_per_image_distances_match_feature_diversity():
    from tools.feature_diversity import feature_distances, random_model

    model, images = random_model("convnextv2_atto", 1, seed=1), torch.randn(6, 1, 64, 64)
    for activation in ("mlp", "block"):
        per_image = V.per_image_distances(model, images, activation, batch_size=4)
        assert per_image.shape == (6, 12)
        expected = [d for stage in feature_distances(model, images, activation) for d in stage]
        assert per_image.mean(axis=0) == pytest.approx(expected, rel=1e-5)
    assert V.stage_columns(model) == [[0, 1], [2, 3], [4, 5, 6, 7, 8, 9], [10, 11]]
    mean, lo, hi = V.bootstrap(np.arange(100.0), 200)
    assert mean == 49.5 and lo < mean < hi and (mean, lo, hi) == V.bootstrap(np.arange(100.0), 200)


def test_finetune_recipe_is_the_ablations_with_a_validation_split(tmp_path):
    r = V.Runner(str(tmp_path), V.STUDIES["full"], 2)
    old = E.Stages(str(tmp_path), E.BUDGETS["long"], 2)
    assert V.finetune_argv(r, 1, "c.pth", 1e-3, 15) == old.finetune_argv(1, "c.pth") + [
        "--val-split", "6000", "--keep-checkpoints", "1"]
    scratch = V.finetune_argv(r, 1, None, 4e-3, 30, encoder_grn=False)
    assert flag(scratch, "--lr") == "0.004" and flag(scratch, "--epochs") == "30" and "--no-encoder-grn" in scratch
    assert flag(scratch, "--eval-every-epochs") == "30" and "--val-subset" not in scratch
    # pretraining: the ablation driver's flags (same losses as its runs), the kNN monitor (test images) off
    g = V.STUDIES["full"].plan[0]
    stages = E.Stages(str(tmp_path), V.pretrain_budget(r.study, g.epochs), 2)
    argv = stages.pretrain_argv(E.ARMS[g.arm], 0)
    assert argv == E.Stages(str(tmp_path), E.BUDGETS["long"], 2).pretrain_argv(E.ARMS["v2-fcmae"], 0)
    assert flag(argv, "--knn-every-epochs") == "0"


def test_full_plan_matches_the_protocol():
    s = V.STUDIES["full"]
    assert (s.val_split, s.labelled, s.finetune_seeds, s.scratch_lrs, s.scratch_epochs) == \
        (6000, 600, (0, 1, 2, 3, 4), (1e-3, 2e-3, 4e-3), (15, 30))
    assert [(g.arm, g.epochs, g.seeds, g.question) for g in s.plan] == [
        ("v2-fcmae", 4, (0, 1, 2), "claim"), ("v1-fcmae", 4, (0, 1, 2), "grn"), ("v2-fcmae", 1, (0,), "dose"),
        ("v2-fcmae", 2, (0,), "dose"), ("naive", 2, (0,), "masking"), ("mask-0.4", 2, (0,), "masking"),
        ("mask-0.75", 2, (0,), "masking")]
    assert s.plan[0].finetune_seeds == s.finetune_seeds and s.diversity_images == 1000
    protocol = open(os.path.join(ROOT, "docs", "experiment", "protocol.md")).read()
    for fact in ("6000", "1e-3, 2e-3, 4e-3", "15, 30", "one-sided 95% lower bound", "+3"):
        assert fact in protocol, fact


class FakeFinetune:
    """The fine-tune CLI: training runs write metrics.json and a config.yaml (JSON) holding a made-up val top-1
    from lr, epochs, seed and init; --eval reads it back (test = val - 1)."""
    CELLS = {(1e-3, 1): 0.0, (1e-3, 2): 3.0, (2e-3, 1): 1.0, (2e-3, 2): 2.0}

    def __init__(self):
        self.train_calls, self.eval_calls = [], []

    def __call__(self, argv):
        if "--eval" in argv:
            self.eval_calls.append(argv)
            with open(flag(argv, "-c")) as f:
                return {"acc1": json.load(f)["acc"] - 1.0, "images": 100}
        self.train_calls.append(argv)
        out = flag(argv, "--output-dir")
        os.makedirs(out, exist_ok=True)
        acc = 60.0 + int(flag(argv, "--seed")) + (10.0 if "--finetune" in argv else 0.0) + \
            self.CELLS.get((float(flag(argv, "--lr")), int(flag(argv, "--epochs"))), 0.0)
        with open(os.path.join(out, "config.yaml"), "w") as f:
            json.dump({"acc": acc}, f)
        metrics = {"complete": True, "acc1": acc, "best_acc1": acc, "steps": 2}
        with open(os.path.join(out, "metrics.json"), "w") as f:
            json.dump(metrics, f)
        return metrics


TINY = V.Study(size=64, val_split=200, finetune_seeds=(0, 1), scratch_lrs=(1e-3, 2e-3), scratch_epochs=(1, 2),
               scratch_grid_seeds=(0,), finetune_epochs=1, knn_bank=100, probe_labels=60, probe_epochs=2,
               probe_lrs=(1e-3, 1e-2), probe_seeds=(0, 1), pixel_weight_decays=(1e-2,), pixel_ks=(1, 5),
               diversity_images=4, bootstrap=20, batch_size=8, test_images=100, max_pretrain_steps=2,
               max_finetune_steps=2, plan=(V.Group("v2-fcmae", 2, (0, 1), (0, 1), "claim"),
                                           V.Group("v1-fcmae", 2, (0,), (0,), "grn")))


@pytest.fixture
def fake_evidence_clis(monkeypatch):
    import fcmae.pretrain.cli
    import finetune.cli

    pre, ft = FakeCLIs(), FakeFinetune()
    monkeypatch.setattr(E, "MODEL", TINY_MODEL)  # the tiny test variant

    def pretrain(argv):
        metrics = pre.pretrain(argv)
        metrics["mean_last_10"] = 1.0
        with open(os.path.join(flag(argv, "--output-dir"), "metrics.json"), "w") as f:
            json.dump(metrics, f)

    monkeypatch.setattr(fcmae.pretrain.cli, "main", pretrain)
    monkeypatch.setattr(finetune.cli, "run", ft)
    monkeypatch.setitem(V.STUDIES, "smoke", TINY)
    return pre, ft


def test_evidence_study_protocol_and_caching(tmp_path, fake_evidence_clis):
    pre, ft = fake_evidence_clis
    work, out = tmp_path / "work", tmp_path / "out"
    argv = ["--study", "evidence", "--budget", "smoke", "--work-dir", str(work), "--out", str(out),
            "--num-workers", "0"]
    res = experiment_main(argv)
    assert res["progress"] == {"done": V.planned_stages(TINY), "total": V.planned_stages(TINY)} and not res["failures"]
    rows = res["rows"]
    for r in rows:
        assert {"arm", "pretrain_epochs", "pretrain_seed", "finetune_seed", "split", "metric", "value"} <= set(r)
        assert r["split"] in ("train", "val", "test")
    # every fine-tune trains on the 600 of its seed next to the held-out split: the data's val/ is never read
    assert all(flag(a, "--val-split") == "200" and flag(a, "--label-fraction") == "0.01" for a in ft.train_calls)
    # the scratch grid (2 lrs x 2 epochs, seed 0) on val only; the best cell (lr 1e-3, 2 epochs) is chosen
    grid = R.select(rows, metric="grid_finetune_top1")
    assert len(grid) == 4 and [(r["lr"], r["finetune_epochs"]) for r in grid if r["selected"]] == [(1e-3, 2)]
    finals = R.select(rows, arm="scratch", metric="finetune_top1", split="test")
    assert sorted((r["finetune_seed"], r["lr"], r["finetune_epochs"]) for r in finals) == [(0, 1e-3, 2), (1, 1e-3, 2)]
    # the test set: one read per final run (2 scratch + 2x2 V2 + 1 V1), never for a grid cell
    assert len(ft.eval_calls) == 7 and len(ft.train_calls) == 4 + 1 + 4 + 1
    assert all(flag(a, "--val-subset") == "100" for a in ft.eval_calls)
    assert len(R.select(rows, metric="finetune_top1", split="test")) == 7
    assert R.select(rows, arm="scratch", finetune_seed=0, metric="finetune_top1", split="test")[0]["value"] == 62.0
    # pretraining: the claim group's seeds first, the V1 group after the claim's fine-tunes
    assert [flag(a, "--seed") for a in pre.pretrain_calls] == ["0", "1", "0"]
    assert "--no-encoder-grn" in pre.pretrain_calls[2] and all(flag(a, "--knn-every-epochs") == "0"
                                                                 for a in pre.pretrain_calls)
    # kNN and probe on val and test per checkpoint (3 + the random init), probe lr chosen on val
    assert len(R.select(rows, metric="knn_top1", split="test")) == 4
    assert len(R.select(rows, metric="probe_top1", split="test")) == 4 * 2
    assert sum(r["selected"] for r in R.select(rows, metric="grid_probe_top1")) == 4
    # pixel baselines per label subset; feature diversity of V2 (2 seeds), V1 and the random init at both points
    assert len(R.select(rows, arm="pixels-logreg", metric="top1", split="test")) == 2
    div = R.select(rows, metric="feature_distance", stage="all")
    assert len(div) == 2 * 4 and all(r["ci_low"] <= r["value"] <= r["ci_high"] for r in div)
    assert len(R.select(rows, metric="feature_distance_difference")) == 2 * 5
    # the claim: V2 (+10 over scratch on every seed) - nested, over the 2 pretraining seeds
    g = R.nested_gain(R.finetune_runs(rows, "v2-fcmae", 2), R.scratch_runs(rows))
    assert g["per_pretrain_seed"] == {0: 7.0, 1: 7.0}  # FCMAE 70 + seed (1 epoch, no grid bonus) vs scratch 63 + seed
    md = (out / "results.md").read_text()
    assert md == R.render(json.loads((out / "results.json").read_text()))
    assert "**Claim: the one-sided 95% lower bound" in md and "| V2-FCMAE | 2 | p0 +7.00, p1 +7.00 |" in md
    timings = R.select(rows, metric="stage_wall_seconds")
    assert len(timings) == V.planned_stages(TINY) and len({r["stage_name"] for r in timings}) == len(timings)
    assert {r["threads"] for r in timings} == {torch.get_num_threads()}

    # again: nothing runs, the same rows (wall times included); --report-only likewise
    evaluations = (work / "evaluations.json").read_text()
    again = experiment_main(argv)
    assert len(ft.train_calls) == 10 and len(ft.eval_calls) == 7 and len(pre.pretrain_calls) == 3
    assert again["rows"] == rows and (work / "evaluations.json").read_text() == evaluations
    assert experiment_main(argv + ["--report-only"])["rows"] == rows


def test_evidence_study_goes_on_after_a_failed_group_and_stops_when_asked(tmp_path, fake_evidence_clis, monkeypatch):
    import fcmae.pretrain.cli
    from fcmae.runtime.errors import EXIT_NONFINITE, EXIT_STOPPED, RunStopped

    pre, ft = fake_evidence_clis
    working = fcmae.pretrain.cli.main

    def nan_for_v1(argv):
        if "--no-encoder-grn" in argv:
            raise RunStopped("non-finite loss at step 2", EXIT_NONFINITE)
        return working(argv)

    monkeypatch.setattr(fcmae.pretrain.cli, "main", nan_for_v1)
    argv = ["--study", "evidence", "--budget", "smoke", "--work-dir", str(tmp_path), "--num-workers", "0"]
    res = experiment_main(argv)
    assert [f["stage"] for f in res["failures"]] == ["v1-fcmae 2 epochs"]
    assert res["progress"]["done"] < res["progress"]["total"]
    assert len(R.select(res["rows"], metric="feature_distance", stage="all")) == 2 * 3  # diversity still ran
    assert "failed stage v1-fcmae 2 epochs: RunStopped: non-finite" in (tmp_path / "results" / "results.md").read_text()

    def stopped(argv):
        raise RunStopped("received SIGTERM", EXIT_STOPPED)

    monkeypatch.setattr(fcmae.pretrain.cli, "main", stopped)
    with pytest.raises(RunStopped):  # a stop request ends the study; it does not skip to the next group
        experiment_main(argv)


def test_a_stage_claimed_by_another_process_is_skipped_and_files_merge(tmp_path):
    """Two processes of a study in one work dir: a stage's lock (flock, gone with its holder) is held by one only,
    and each JSON write keeps the other process's entries."""
    a, b = V.Runner(str(tmp_path), TINY, 0), V.Runner(str(tmp_path), TINY, 0)
    held = a.claim("stage x")
    assert held is not None and b.claim("stage x") is None and b.skipped == 1
    held.close()  # the holder ended
    again = b.claim("stage x")
    assert again is not None
    again.close()
    V.merge_json(a.stats_path, "from a", 1)
    assert V.merge_json(b.stats_path, "from b", 2) == {"from a": 1, "from b": 2}


def test_evidence_study_with_stages_held_elsewhere_looks_again(tmp_path, fake_evidence_clis, monkeypatch):
    """Stages another process holds (here: the first pretraining and the first scratch grid run, released when the
    study waits) are skipped, the stages after them run, and the next pass runs them and what depends on them:
    every stage runs once and the values are those of a study run alone."""
    pre, ft = fake_evidence_clis
    argv = ["--study", "evidence", "--budget", "smoke", "--num-workers", "0"]
    alone = experiment_main(argv + ["--work-dir", str(tmp_path / "alone")])
    calls = len(pre.pretrain_calls), len(ft.train_calls), len(ft.eval_calls)
    held, waits, real_claim = set(), [], V.Runner.claim

    def claim(self, name):
        first = next((p for p in ("pretrain_v2", "finetune_scratch") if name.startswith(p)), None)
        if not waits and first and not any(h.startswith(first) for h in held):
            held.add(name)
            self.skipped += 1
            return None
        return real_claim(self, name)

    monkeypatch.setattr(V.Runner, "claim", claim)
    monkeypatch.setattr(V.time, "sleep", waits.append)
    shared = experiment_main(argv + ["--work-dir", str(tmp_path / "shared")])
    assert len(held) == 2 and waits == [120] and not shared["failures"]
    assert (len(pre.pretrain_calls), len(ft.train_calls), len(ft.eval_calls)) == tuple(2 * c for c in calls)

    def values(res):
        return sorted((json.dumps({k: v for k, v in r.items() if k not in ("wall_seconds", "cpu_seconds",
                                                                          "load_avg_1m", "img_per_s")},
                                  sort_keys=True), r["value"]) for r in res["rows"]
                      if not r["metric"].endswith(("wall_seconds", "img_per_s")))
    assert values(shared) == values(alone) and shared["progress"] == alone["progress"]


def test_evidence_report_check_catches_drift(tmp_path, fake_evidence_clis):
    argv = ["--study", "evidence", "--budget", "smoke", "--work-dir", str(tmp_path / "w"), "--out",
            str(tmp_path / "out"), "--num-workers", "0"]
    experiment_main(argv)
    results = str(tmp_path / "out" / "results.json")
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n{R.BEGIN}\nold\n{R.END}\n\nmore\n")
    assert R.main([results, "--readme", str(readme), "--check"]) == 1  # the block is stale
    assert R.main([results, "--readme", str(readme)]) == 0
    assert R.main([results, "--readme", str(readme), "--check"]) == 0
    text = readme.read_text()
    assert text.startswith("# x\n\n" + R.BEGIN) and text.endswith(R.END + "\n\nmore\n") and "**Claim:" in text
    data = json.loads(open(results).read())
    r = R.select(data["rows"], arm="scratch", metric="finetune_top1", split="test")[0]
    r["value"] += 0.5  # a figure changed in the source: both generated files are now stale
    with open(results, "w") as f:
        json.dump(data, f)
    assert R.main([results, "--readme", str(readme), "--check"]) == 1


def test_committed_evidence_tables_are_generated_from_their_rows():
    """docs/experiment/evidence/results.md and the README's evidence block are what results.json gives; the README
    has an evidence block only when the results it is generated from are committed."""
    results = os.path.join(ROOT, "docs", "experiment", "evidence", "results.json")
    readme = os.path.join(ROOT, "README.md")
    if not os.path.exists(results):
        assert R.BEGIN not in open(readme).read()
        return
    for path, content in R.outputs(results, readme).items():
        assert open(path).read() == content, f"{path}: run python -m tools.experiment_report {results} --readme"


def test_evidence_study_end_to_end_through_the_real_clis(tmp_path, monkeypatch):
    """The smallest study through the real CLIs: pretraining, a one-cell scratch grid, the fine-tunes on the
    held-out split, their test reads with --eval, kNN/probe, diversity; then everything reused."""
    monkeypatch.setattr(E, "MODEL", TINY_MODEL)  # the tiny test variant
    monkeypatch.setitem(V.STUDIES, "smoke", replace_study(
        TINY, finetune_seeds=(0,), scratch_lrs=(1e-3,), scratch_epochs=(1,), plan=(V.Group("v2-fcmae", 1, (0,), (0,),
                                                                                           "claim"),)))
    argv = ["--study", "evidence", "--budget", "smoke", "--work-dir", str(tmp_path), "--num-workers", "0"]
    res = experiment_main(argv)
    assert not res["failures"] and res["progress"]["done"] == res["progress"]["total"] == 1 + 4 + 1 + 1 + 1 + 4
    rows = res["rows"]
    test = R.select(rows, metric="finetune_top1", split="test")
    assert {r["arm"] for r in test} == {"scratch", "v2-fcmae"} and all(r["images"] == 100 for r in test)
    assert all(0 <= r["value"] <= 100 for r in rows if r["metric"].endswith("top1"))
    assert R.select(rows, metric="pretrain_loss")[0]["steps"] == 2
    log_text = (tmp_path / V.finetune_name(V.STUDIES["smoke"], "scratch", 0, 1e-3, 1) / "log.txt").read_text()
    assert "200 val images held out from the training set" in log_text
    mtimes = {p: p.stat().st_mtime for p in tmp_path.glob("*/metrics.json")}
    assert experiment_main(argv)["rows"] == rows and {p: p.stat().st_mtime for p in tmp_path.glob("*/metrics.json")} == mtimes


def replace_study(study, **changes):
    from dataclasses import replace

    return replace(study, **changes)
