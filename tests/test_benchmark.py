"""tools.benchmark end to end on a tiny configuration (the figures in its JSON are consistent with each other), and
tools.bench_memory's largest-batch search against known memory models (one real measurement)."""
import argparse
import json
import math

import pytest

from tools import bench_memory
from tools.benchmark import CANDIDATES, RATIOS, main

GIB = bench_memory.GIB


def test_benchmark_smoke(tmp_path):
    out = tmp_path / "new" / "folder" / "bench.json"  # a folder that does not exist yet is created
    # one thread: the tiny steps gain nothing from more, and a shared machine makes extra threads stall
    report = main(["--variants", "test", "--input-sizes", "64", "--batch-sizes", "2", "--rounds", "3", "--threads", "1",
                   "--amp", "none", "bf16", "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    report = json.loads(out.read_text())
    assert report["amp"] == ["none", "bf16"] and report["threads"] == 1
    (res,) = report["results"]
    assert (res["variant"], res["input_size"], res["batch_size"], res["mask_ratio"]) == ("test", [64, 64], 2, 0.6)
    names = report["candidates"]
    expected = {f"{c}/{amp}" for c in ("sparse", "dense", "timm", "finetune") for amp in ("none", "bf16")}
    assert expected <= set(names) <= expected | {"minkowski/none"}  # minkowski where it imports, float32 only
    assert all(name.split("/")[0] in CANDIDATES for name in names)
    assert set(res["candidates"]) == set(names)
    for name in names:
        cand = res["candidates"][name]
        assert "error" not in cand, (name, cand)
        assert cand["amp"] == name.split("/")[1], name  # every result says its precision
        times = cand["times_s"]
        assert len(times) == 3 and all(t > 0 for t in times), name
        assert cand["min_s"] == min(times) and cand["max_s"] == max(times), name
        assert cand["min_s"] <= cand["median_s"] <= cand["max_s"], name
        assert cand["median_s"] == sorted(times)[1], name
        assert cand["images_per_s"] == pytest.approx(2 / cand["median_s"], rel=1e-12), name
        assert cand["peak_memory_bytes"] > 0 and cand["peak_rss_bytes"] > cand["peak_memory_bytes"], name
    # every ratio is the quotient of its two candidates' figures, at the median and at the minimum
    assert set(res["ratios"]) == set(res["ratios_min"]) == set(res["targets"])
    for key, (num, den, what, test, text) in RATIOS.items():
        if num not in names or den not in names:
            assert key not in res["ratios"], key
            continue
        a, b = res["candidates"][num], res["candidates"][den]
        if what == "time":
            assert res["ratios"][key] == pytest.approx(a["median_s"] / b["median_s"], rel=1e-12), key
            assert res["ratios_min"][key] == pytest.approx(a["min_s"] / b["min_s"], rel=1e-12), key
        else:
            quotient = a["peak_memory_bytes"] / b["peak_memory_bytes"]
            assert res["ratios"][key] == res["ratios_min"][key] == pytest.approx(quotient, rel=1e-12), key
        target = res["targets"][key]
        assert target["target"] == text
        assert target["met_median"] == bool(test(res["ratios"][key]))
        assert target["met_min"] == bool(test(res["ratios_min"][key]))
    for key in ("sparse_over_dense_time", "sparse_over_timm_supervised_time", "sparse_over_dense_peak_memory",
                "finetune_over_bare_timm_time", "sparse_bf16_over_timm_bf16_time", "sparse_bf16_over_dense_bf16_time"):
        assert key in res["ratios"], key


# --------------------------------------------------------------------------------------------------
# bench_memory: the search, against known memory models


class Model:
    """peak(batch) = fixed + per_image x batch, plus `extra` bytes per image beyond `kink` (activations spilling
    into another allocation pattern); a batch over `dies_above` kills the process (peak None)."""

    def __init__(self, fixed, per_image, kink=None, extra=0, dies_above=None):
        self.fixed, self.per_image, self.kink, self.extra, self.dies_above = fixed, per_image, kink, extra, dies_above
        self.calls = []

    def peak(self, batch):
        over = max(0, batch - self.kink) if self.kink is not None else 0
        return self.fixed + self.per_image * batch + self.extra * over

    def largest(self, budget):
        return max(b for b in range(1, 100_000) if self.peak(b) <= budget and
                   (self.dies_above is None or b <= self.dies_above))

    def __call__(self, args, batch, checkpointing):
        self.calls.append(batch)
        if self.dies_above is not None and batch > self.dies_above:
            return {"batch": batch, "peak_bytes": None, "error": "killed (exit -9)"}
        return {"batch": batch, "peak_bytes": self.peak(batch), "step_seconds": 0.01 * batch, "loss": 1.0}


ARGS = argparse.Namespace(probe_batches=[2, 6])


@pytest.mark.parametrize("budget_gib", [3, 7.5, 24])
def test_largest_batch_on_a_line_is_exact(budget_gib):
    model = Model(fixed=2 * GIB, per_image=50 * 2 ** 20)
    budget = budget_gib * GIB
    result = bench_memory.largest_batch(ARGS, False, budget, measure=model)
    assert result["best"]["batch"] == model.largest(budget)
    assert result["fixed_bytes"] == pytest.approx(2 * GIB) and result["per_image_bytes"] == pytest.approx(50 * 2 ** 20)
    assert model.calls == [2, 6, model.largest(budget)]  # two probes, one measurement
    assert [m["batch"] for m in result["measurements"]] == model.calls


@pytest.mark.parametrize("extra_mib", [20, 200])
def test_largest_batch_with_a_kink_fits_and_is_close(extra_mib):
    """Beyond batch 40 each image costs more: the line from the small probes over-predicts the batch; the search
    refits through the over-budget point and ends under the budget, close to the largest batch that fits."""
    model = Model(fixed=2 * GIB, per_image=50 * 2 ** 20, kink=40, extra=extra_mib * 2 ** 20)
    budget = 12 * GIB
    result = bench_memory.largest_batch(ARGS, True, budget, measure=model)
    best, largest = result["best"]["batch"], model.largest(budget)
    assert model.peak(best) == result["best"]["peak_bytes"] <= budget
    assert 0.9 * largest <= best <= largest, (best, largest, model.calls)
    assert len(model.calls) <= 8, model.calls
    assert result["checkpointing"] is True


def test_largest_batch_steps_down_past_killed_measurements():
    model = Model(fixed=1 * GIB, per_image=10 * 2 ** 20, dies_above=100)
    result = bench_memory.largest_batch(ARGS, False, 8 * GIB, measure=model)
    assert result["best"]["batch"] <= 100 and result["best"]["peak_bytes"] <= 8 * GIB
    assert result["best"]["batch"] >= 0.9 * 100 * 0.9  # a few 10% steps down from the prediction
    assert any(m["peak_bytes"] is None for m in result["measurements"])


def test_largest_batch_errors():
    with pytest.raises(SystemExit, match="not even batch 1 fits"):
        bench_memory.largest_batch(argparse.Namespace(probe_batches=[1, 2]), False, 1 * GIB,
                                   measure=Model(fixed=2 * GIB, per_image=2 ** 20))
    with pytest.raises(SystemExit, match="did not grow"):
        bench_memory.largest_batch(ARGS, False, 8 * GIB, measure=Model(fixed=GIB, per_image=0))
    with pytest.raises(SystemExit, match="probe step at batch 6 failed"):
        bench_memory.largest_batch(ARGS, False, 8 * GIB, measure=Model(fixed=GIB, per_image=2 ** 20, dies_above=5))


def test_bench_memory_main_writes_both_searches(tmp_path, monkeypatch, capsys):
    model = Model(fixed=2 * GIB, per_image=50 * 2 ** 20)
    monkeypatch.setattr(bench_memory.largest_batch, "__defaults__", (model,))
    monkeypatch.setattr(bench_memory, "available_bytes", lambda: 6 * GIB + GIB // 2)  # caps the 24 GiB default
    out = tmp_path / "new" / "mem.json"
    results = bench_memory.main(["--model", "convnextv2_atto", "--input-size", "64", "--probe-batches", "2", "6",
                                 "--json", str(out)])
    report = json.loads(out.read_text())
    assert report["budget_bytes"] == 6 * GIB
    assert [r["checkpointing"] for r in report["results"]] == [False, True]
    for r in results:
        assert r["best"]["batch"] == model.largest(6 * GIB)
    assert "largest batch" in capsys.readouterr().out


def test_bench_memory_one_real_measurement():
    config = argparse.Namespace(model="convnextv2_test", input_size=64, backend="sparse", threads=1)
    row = bench_memory.measure(config, 1, False)
    assert row["batch"] == 1 and row["peak_bytes"] > 100 * 2 ** 20  # torch alone is more
    assert row["step_seconds"] > 0 and math.isfinite(row["loss"])
