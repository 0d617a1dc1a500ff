"""summary.md of a tools/gpu_check.sh output folder: device, test result, step benchmark table and ratios, loader
throughput. `python -m tools.gpu_summary OUTDIR` prints it."""
import json
import os
import sys


def _load(path):
    return json.load(open(path)) if os.path.exists(path) else None


def summary(out: str) -> str:
    lines = ["# GPU check", ""]
    device = open(os.path.join(out, "device.txt")).read().strip() if os.path.exists(os.path.join(out, "device.txt")) else "?"
    lines += [f"Device: {device}", "", "| step | exit code | seconds |", "|---|---|---|"]
    for line in open(os.path.join(out, "status.txt")).read().split("\n"):
        if line.strip():
            name, rc, sec = line.split()
            lines.append(f"| {name} | {rc} | {sec} |")
    tests = os.path.join(out, "tests.log")
    if os.path.exists(tests):
        tail = [l for l in open(tests).read().splitlines() if l.strip()]
        lines += ["", f"Tests: `{tail[-1] if tail else 'no output'}`"]
    steps = _load(os.path.join(out, "bench_steps.json"))
    if steps:
        lines += ["", "## Training steps", "", "| config | candidate | median ms | min ms | images/s | peak MiB |",
                  "|---|---|---|---|---|---|"]
        for res in steps["results"]:
            cfg = f"{res['variant']} {res['input_size'][0]} b{res['batch_size']}"
            for name, r in res["candidates"].items():
                if "median_s" in r:
                    mem = r.get("peak_memory_bytes")
                    lines.append(f"| {cfg} | {name} | {r['median_s'] * 1e3:.1f} | {r['min_s'] * 1e3:.1f} | "
                                 f"{r['images_per_s']:.1f} | {'n/a' if mem is None else f'{mem / 2 ** 20:.0f}'} |")
                else:
                    lines.append(f"| {cfg} | {name} | failed: {r.get('error', '?')[:80]} | | | |")
        lines += ["", "| config | ratio | median | min | target |", "|---|---|---|---|---|"]
        for res in steps["results"]:
            cfg = f"{res['variant']} {res['input_size'][0]} b{res['batch_size']}"
            for key, value in res["ratios"].items():
                low = res["ratios_min"].get(key)
                if value is not None and low is not None:
                    lines.append(f"| {cfg} | {key} | {value:.3f} | {low:.3f} | {res['targets'][key]['target']} |")
    loader = _load(os.path.join(out, "bench_loader.json"))
    if loader:
        lines += ["", "## Input pipeline", "", "```", json.dumps(loader.get("summary", loader), indent=1)[:3000], "```"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(summary(sys.argv[1]), end="")
