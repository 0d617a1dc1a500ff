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
