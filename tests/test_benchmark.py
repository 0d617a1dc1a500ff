"""tools.benchmark end to end on a tiny configuration: every candidate runs and the JSON holds every ratio."""
import json

from tools.benchmark import CANDIDATES, RATIOS, main


def test_benchmark_smoke(tmp_path):
    out = tmp_path / "bench.json"
    # one thread: the tiny steps gain nothing from more, and a shared machine makes extra threads stall
    main(["--variants", "atto", "--input-sizes", "64", "--batch-sizes", "2", "--rounds", "1", "--threads", "1",
          "--json", str(out)])
    report = json.loads(out.read_text())
    (res,) = report["results"]
    assert set(res["ratios"]) == set(RATIOS)
    for name in report["candidates"]:
        assert name in CANDIDATES
        cand = res["candidates"][name]
        assert cand["median_s"] > 0 and cand["images_per_s"] > 0, name
        assert cand["peak_memory_bytes"] > 0, name  # measured in its own process
    for key in ("sparse_over_dense_time", "sparse_over_timm_supervised_time", "sparse_over_dense_peak_memory",
                "finetune_over_bare_timm_time"):
        assert res["ratios"][key] > 0, key


def test_bench_memory_finds_a_batch_under_the_budget(tmp_path):
    """The largest-batch search on a small configuration: the batch it reports was measured under the budget.
    The budget is this machine's own batch-1 peak plus 0.3 GiB, since the resident size of a process that has
    imported torch differs between machines."""
    import argparse

    from tools import bench_memory

    config = dict(model="convnextv2_atto", input_size=128, backend="sparse", threads=1)
    baseline = bench_memory.measure(argparse.Namespace(**config), 1, False)["peak_bytes"]
    limit = baseline / bench_memory.GIB + 0.3
    out = tmp_path / "mem.json"
    results = bench_memory.main(["--model", "convnextv2_atto", "--input-size", "128", "--limit-gib", f"{limit:.3f}",
                                 "--probe-batches", "4", "32", "--threads", "1", "--json", str(out)])
    report = json.loads(out.read_text())
    assert [r["checkpointing"] for r in report["results"]] == [False, True]
    for r in results:
        best = r["best"]
        assert best["peak_bytes"] <= report["budget_bytes"]
        assert best["batch"] > 4 and best["step_seconds"] > 0  # 0.3 GiB holds more than the small probe
        assert r["per_image_bytes"] > 0


def test_bench_memory_rejects_bad_arguments(capsys):
    import pytest

    from tools import bench_memory

    for argv in (["--model", "convnextv2_giant"], ["--input-size", "100"], ["--probe-batches", "3", "1"]):
        with pytest.raises(SystemExit) as exc:
            bench_memory.main(argv)
        assert exc.value.code == 2, argv
        assert "error:" in capsys.readouterr().err
