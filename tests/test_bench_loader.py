"""tools/bench_loader.py on a few generated JPEGs: the pipelines (ours, ours with --augment-on-device, the reference
recipe) run and are compared, the per-stage profile runs, and bad invocations are one line with exit code 2."""
import json

from fcmae.runtime.cli import run_cli
from tools.bench_loader import make_jpegs, run


def test_make_jpegs_benchmark_and_profile(tmp_path, capsys):
    paths = make_jpegs(str(tmp_path / "jpegs"), 12, (64, 48), classes=3)
    assert len(paths) == 12 and all(p.endswith(".jpg") for p in paths)
    out = tmp_path / "bench.json"
    result = run(["--data", str(tmp_path / "jpegs"), "--workers", "0", "1", "--batch-size", "4", "--input-size", "64",
                  "--rounds", "2", "--device", "cpu", "--augment-on-device", "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result)) and result["complete"]
    for r in result["runs"]:
        assert len(r["ours"]["rounds"]) == len(r["baseline"]["rounds"]) == len(r["ours_device"]["rounds"]) == 2
        assert r["ours"]["ratio"] > 0 and r["ours_loader"]["paired_ratio"] > 0 and r["ours_device"]["ratio"] > 0
    assert "workers 1: ours " in capsys.readouterr().out
    profile = run(["--data", str(tmp_path / "jpegs"), "--profile", "6", "--input-size", "64", "--batch-size", "4"])
    assert profile["profile"]["files"] == 6 and profile["profile"]["ours: mask"] > 0


def test_bad_invocations(tmp_path, capsys):
    for argv, message in [([], "give --data"), (["--make-jpegs", str(tmp_path), "--size", "5x"], "--size '5x'"),
                          (["--data", "s/a-{0..1}.tar"], "--baseline-data")]:
        assert run_cli(run, argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
